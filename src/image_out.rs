//! Images out: sample grids, one PNG per sample, trajectory strips and animated GIFs.
//!
//! Every function takes images as tensors `[N, C, H, W]` (C = 1 or 3, values in [-1, 1], any
//! float dtype, any device) and maps each value to a byte by
//!
//! ```text
//! byte = round((clamp(x, -1, 1) + 1) * 127.5)        (-1 -> 0, 0 -> 128, 1 -> 255)
//! ```
//!
//! the inverse of the datasets' `x = v / 127.5 - 1`, so a real image round-trips to its bytes.
//! A non-finite value is an error (a diverged sampler should be seen, not drawn as black).
//! Pictures are encoded in memory and written with [`crate::io::atomic_write`].
//!
//! Layout of grids and strips: cells of `H * scale x W * scale` pixels (each pixel repeated
//! `scale x scale` times), separated and surrounded by a `gutter`-pixel white border.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

use crate::error::{Error, Result};
use crate::io::atomic_write;

/// The gutter colour (white).
pub const GUTTER_VALUE: u8 = 255;

/// How a grid is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridOptions {
    /// Images per row; `None`: `ceil(sqrt(N))`.
    pub columns: Option<usize>,
    /// Integer upscale of every pixel; `None`: [`auto_scale`].
    pub scale: Option<usize>,
    /// Border width in pixels between and around cells.
    pub gutter: usize,
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            columns: None,
            scale: None,
            gutter: 2,
        }
    }
}

/// The upscale that makes the longer image side at least 56 pixels: `max(1, ceil(56 / max(H, W)))`
/// (28x28 and 32x32 -> 2, 16x16 -> 4, 64x64 -> 1).
pub fn auto_scale(height: usize, width: usize) -> usize {
    56usize.div_ceil(height.max(width).max(1)).max(1)
}

/// Maps a value in [-1, 1] to a byte (see the module docs).
pub fn to_byte(x: f32) -> u8 {
    ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// A batch of images copied to the CPU as bytes: `n` images of `[c, h, w]`.
struct Bytes {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    data: Vec<u8>,
}

impl Bytes {
    fn from_tensor(images: &Tensor, what: &str) -> Result<Self> {
        let (n, c, h, w) = images
            .dims4()
            .map_err(|_| Error::param(what, format!("shape {:?}, expected [N, C, H, W]", images.dims())))?;
        if c != 1 && c != 3 {
            return Err(Error::param(
                what,
                format!("{c} channels, expected 1 (grey) or 3 (RGB)"),
            ));
        }
        let values = images
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::Numerical(format!(
                "{what}: {bad} of {} values are not finite (NaN or infinite)",
                values.len()
            )));
        }
        Ok(Bytes {
            n,
            c,
            h,
            w,
            data: values.into_iter().map(to_byte).collect(),
        })
    }

    fn image(&self, i: usize) -> &[u8] {
        let per = self.c * self.h * self.w;
        &self.data[i * per..(i + 1) * per]
    }
}

/// An interleaved canvas of `channels` (1 or 3) bytes per pixel.
struct Canvas {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl Canvas {
    /// A canvas for `rows x cols` cells of `h x w` images at `scale`, filled with the gutter colour.
    fn for_cells(
        rows: usize,
        cols: usize,
        c: usize,
        h: usize,
        w: usize,
        scale: usize,
        gutter: usize,
    ) -> Result<Self> {
        let side = |cells: usize, len: usize| {
            cells
                .checked_mul(len.checked_mul(scale)?)?
                .checked_add(cells.checked_add(1)?.checked_mul(gutter)?)
        };
        let (width, height) = match (side(cols, w), side(rows, h)) {
            (Some(width), Some(height)) if width <= u32::MAX as usize && height <= u32::MAX as usize => {
                (width, height)
            }
            _ => return Err(Error::param("grid", "the picture would be too large")),
        };
        let len = width
            .checked_mul(height)
            .and_then(|v| v.checked_mul(c))
            .ok_or_else(|| Error::param("grid", "the picture would be too large"))?;
        Ok(Canvas {
            width,
            height,
            channels: c,
            data: vec![GUTTER_VALUE; len],
        })
    }

    /// Draws image `pixels` (`[c, h, w]` bytes) with its top-left corner at `(x0, y0)`.
    fn blit(&mut self, pixels: &[u8], h: usize, w: usize, scale: usize, x0: usize, y0: usize) {
        let c = self.channels;
        for y in 0..h * scale {
            for x in 0..w * scale {
                let at = ((y0 + y) * self.width + x0 + x) * c;
                for ch in 0..c {
                    self.data[at + ch] = pixels[(ch * h + y / scale) * w + x / scale];
                }
            }
        }
    }

    fn into_image(self) -> Result<DynamicImage> {
        let (w, h) = (self.width as u32, self.height as u32);
        let wrong = || Error::Numerical("image buffer has the wrong size".into());
        Ok(if self.channels == 1 {
            DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, self.data).ok_or_else(wrong)?)
        } else {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, self.data).ok_or_else(wrong)?)
        })
    }
}

/// Lays out `cells[row][col]` (indices into `batches[frame]`, image `i`) on one canvas.
fn render(
    batches: &[Bytes],
    cells: &[(usize, usize, usize, usize)], // (row, col, frame, image)
    rows: usize,
    cols: usize,
    scale: usize,
    gutter: usize,
) -> Result<DynamicImage> {
    let b0 = &batches[0];
    let mut canvas = Canvas::for_cells(rows, cols, b0.c, b0.h, b0.w, scale, gutter)?;
    for &(row, col, frame, i) in cells {
        let x0 = gutter + col * (b0.w * scale + gutter);
        let y0 = gutter + row * (b0.h * scale + gutter);
        canvas.blit(batches[frame].image(i), b0.h, b0.w, scale, x0, y0);
    }
    canvas.into_image()
}

fn check_scale(opts: &GridOptions, h: usize, w: usize) -> Result<usize> {
    match opts.scale {
        Some(0) => Err(Error::param("scale", "got 0, expected an integer >= 1")),
        Some(s) => Ok(s),
        None => Ok(auto_scale(h, w)),
    }
}

/// The grid picture of `images` `[N, C, H, W]` (row-major: image `i` at row `i / columns`,
/// column `i % columns`), greyscale for C = 1, RGB for C = 3.
pub fn grid_image(images: &Tensor, opts: &GridOptions) -> Result<DynamicImage> {
    let b = Bytes::from_tensor(images, "images")?;
    if b.n == 0 {
        return Err(Error::param(
            "images",
            "an empty batch, expected at least one image",
        ));
    }
    let cols = match opts.columns {
        Some(0) => return Err(Error::param("columns", "got 0, expected at least 1")),
        Some(c) => c.min(b.n),
        None => (1..=b.n).find(|c| c * c >= b.n).unwrap_or(b.n),
    };
    let rows = b.n.div_ceil(cols);
    let scale = check_scale(opts, b.h, b.w)?;
    let cells: Vec<_> = (0..b.n).map(|i| (i / cols, i % cols, 0, i)).collect();
    render(&[b], &cells, rows, cols, scale, opts.gutter)
}

/// Saves a grid with one row per class: `images` `[K * columns, C, H, W]` row-major, row `r`
/// labelled `row_labels[r]` in a left margin, under `title`.
pub fn save_labelled_grid(
    path: &Path,
    images: &Tensor,
    columns: usize,
    row_labels: &[String],
    title: &str,
) -> Result<()> {
    let pic = grid_image(
        images,
        &GridOptions {
            columns: Some(columns),
            ..Default::default()
        },
    )?
    .to_rgb8();
    let rows = row_labels.len().max(1);
    let h = pic.height() as f64 / rows as f64;
    let labels: Vec<(i32, String)> = row_labels
        .iter()
        .enumerate()
        .map(|(r, l)| (((r as f64 + 0.5) * h) as i32, l.clone()))
        .collect();
    crate::plot::save_annotated(path, &pic, &labels, &[], title)
}

/// The strip picture of `frames` (each `[N, C, H, W]`, all the same shape): row `i` shows image
/// `i` of every frame from left to right (e.g. x_t and the predicted x_0 across the reverse
/// process).
pub fn strip_image(frames: &[Tensor], opts: &GridOptions) -> Result<DynamicImage> {
    let batches = frames
        .iter()
        .enumerate()
        .map(|(f, t)| Bytes::from_tensor(t, &format!("frame {f}")))
        .collect::<Result<Vec<_>>>()?;
    let first = batches
        .first()
        .ok_or_else(|| Error::param("frames", "no frames, expected at least one"))?;
    let shape = (first.n, first.c, first.h, first.w);
    if first.n == 0 {
        return Err(Error::param(
            "frames",
            "empty frames, expected at least one image",
        ));
    }
    for (f, b) in batches.iter().enumerate() {
        if (b.n, b.c, b.h, b.w) != shape {
            return Err(Error::param(
                "frames",
                format!(
                    "frame {f} has shape {:?}, expected {:?} like frame 0",
                    [b.n, b.c, b.h, b.w],
                    [shape.0, shape.1, shape.2, shape.3]
                ),
            ));
        }
    }
    let scale = check_scale(opts, shape.2, shape.3)?;
    let cells: Vec<_> = (0..shape.0)
        .flat_map(|i| (0..batches.len()).map(move |f| (i, f, f, i)))
        .collect();
    render(&batches, &cells, shape.0, batches.len(), scale, opts.gutter)
}

fn encode_png(image: &DynamicImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::Numerical(format!("PNG encoding failed: {e}")))?;
    Ok(bytes)
}

/// Writes `images` `[N, C, H, W]` in [-1, 1] as one PNG grid with `columns` images per row,
/// a 2-pixel gutter and the [`auto_scale`] upscale.
pub fn save_grid(path: &Path, images: &Tensor, columns: usize) -> Result<()> {
    let opts = GridOptions {
        columns: Some(columns),
        ..GridOptions::default()
    };
    save_grid_with(path, images, &opts)
}

/// [`save_grid`] with explicit layout options.
pub fn save_grid_with(path: &Path, images: &Tensor, opts: &GridOptions) -> Result<()> {
    atomic_write(path, &encode_png(&grid_image(images, opts)?)?)
}

/// Writes one PNG per image at its own size, `dir/{prefix}{i:05}.png` for i = 0 .. N-1.
pub fn save_images(dir: &Path, images: &Tensor, prefix: &str) -> Result<()> {
    save_images_from(dir, images, prefix, 0)
}

/// [`save_images`] numbering from `first_index` (for batches written one after another).
pub fn save_images_from(dir: &Path, images: &Tensor, prefix: &str, first_index: usize) -> Result<()> {
    let b = Bytes::from_tensor(images, "images")?;
    for i in 0..b.n {
        let mut canvas = Canvas::for_cells(1, 1, b.c, b.h, b.w, 1, 0)?;
        canvas.blit(b.image(i), b.h, b.w, 1, 0, 0);
        let path = dir.join(format!("{prefix}{:05}.png", first_index + i));
        atomic_write(&path, &encode_png(&canvas.into_image()?)?)?;
    }
    Ok(())
}

/// Writes a strip PNG (see [`strip_image`]) with a 2-pixel gutter and the [`auto_scale`] upscale.
pub fn save_strip(path: &Path, frames: &[Tensor]) -> Result<()> {
    atomic_write(path, &encode_png(&strip_image(frames, &GridOptions::default())?)?)
}

/// Writes an animated GIF, looping forever: frame `f` is the grid of `frames[f]` (each
/// `[N, C, H, W]`, all the same shape; default [`GridOptions`]) shown for `delay_ms`
/// milliseconds (GIF stores delays in 10 ms units: rounded down).
pub fn save_gif(path: &Path, frames: &[Tensor], delay_ms: u32) -> Result<()> {
    if frames.is_empty() {
        return Err(Error::param("frames", "no frames, expected at least one"));
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new_with_speed(&mut bytes, 10);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .map_err(|e| Error::Numerical(format!("GIF encoding failed: {e}")))?;
        for (f, t) in frames.iter().enumerate() {
            if t.dims() != frames[0].dims() {
                return Err(Error::param(
                    "frames",
                    format!(
                        "frame {f} has shape {:?}, expected {:?} like frame 0",
                        t.dims(),
                        frames[0].dims()
                    ),
                ));
            }
            let rgba: RgbaImage = grid_image(t, &GridOptions::default())?.to_rgba8();
            let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
            encoder
                .encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .map_err(|e| Error::Numerical(format!("GIF encoding failed: {e}")))?;
        }
    }
    atomic_write(path, &bytes)
}
