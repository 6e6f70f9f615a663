//! Image folders: PNG and JPEG files found recursively, decoded, converted to 1 or 3 channels,
//! and (with an image size) resized so the shorter side is the size, then centre-cropped.
//!
//! - **Splits**: a folder with `train/` and/or `test/` subfolders has splits and each split is
//!   its subfolder; any other folder is used whole as the train split (asking it for `test` is an
//!   error that says so).
//! - **Labels**: when every image lies inside a subfolder of the split, the first subfolder's
//!   name is its class; class indices follow the sorted subfolder names (of both splits, so
//!   train and test agree). Otherwise the dataset is unlabelled.
//! - **Channels**: 1 or 3 as asked; when not asked, 1 if every image is greyscale, else 3.
//!   Colour to grey is the ITU-R BT.601 luma (see [`super::convert_channels`]); alpha is dropped.
//! - **Sizes**: without an image size every image must have the first one's size (the error
//!   names the first file that differs).
//! - Files and folders whose names start with `.` are skipped, as are files that are not
//!   `.png`, `.jpg` or `.jpeg` (any case). Files are read in sorted path order.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{convert_channels, resize::resize_and_crop, ImageDataset, Split};
use crate::error::{Error, Result};

/// The most pixels a PNG or JPEG file can hold per byte of its size: a 1-bit PNG packs 8 pixels
/// in a byte of scanline, and deflate expands at most 1032:1 (258-byte matches coded in 2 bits);
/// JPEG needs at least a bit per 8x8 block and channel (512 pixels per byte). An image that
/// declares more pixels than `MAX_PIXELS_PER_BYTE` times its file size is refused before
/// anything is allocated for it.
pub const MAX_PIXELS_PER_BYTE: usize = 8 * 1032;

/// The same bound for JPEG files: every 8x8 block of every channel costs at least one bit
/// (its DC code, in the first scan), so a byte holds at most 8 * 64 = 512 pixels.
pub const MAX_JPEG_PIXELS_PER_BYTE: usize = 512;

/// File extensions read as images (compared case-insensitively).
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One decoded image: `channels` (1 or 3) planes of `height x width` in [-1, 1].
struct Decoded {
    planes: Vec<f32>,
    channels: usize,
    height: usize,
    width: usize,
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

/// Image files under `root`, recursively, sorted. Symbolic links to folders are not followed.
fn collect_images(root: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        let file_type = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if file_type.is_dir() {
            collect_images(&path, out)?;
        } else if is_image(&path) && path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// The non-hidden subfolder names of `dir` (empty if it cannot be read).
fn subfolders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// The split's root folder and the folders whose subfolders name the classes.
fn split_root(dir: &Path, split: Split) -> Result<(PathBuf, Vec<PathBuf>)> {
    let (train, test) = (dir.join("train"), dir.join("test"));
    if train.is_dir() || test.is_dir() {
        let root = match split {
            Split::Train => train.clone(),
            Split::Test => test.clone(),
        };
        if !root.is_dir() {
            return Err(Error::bad_input(
                dir,
                format!(
                    "has a {} subfolder but no {split}/ subfolder for the {split} split",
                    {
                        if split == Split::Train {
                            "test/"
                        } else {
                            "train/"
                        }
                    }
                ),
            ));
        }
        return Ok((root, vec![train, test]));
    }
    if split == Split::Test {
        return Err(Error::bad_input(
            dir,
            "has no train/ and test/ subfolders, so the whole folder is the train split and there \
             is no test split (use --split train)",
        ));
    }
    Ok((dir.to_path_buf(), vec![dir.to_path_buf()]))
}

/// Decodes one image into its native channel count (1 for greyscale, else 3), resized and
/// cropped to `image_size` when given.
fn decode(path: &Path, image_size: Option<usize>) -> Result<Decoded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let undecodable = |e: image::ImageError| {
        // decoders' messages may span lines; errors are one line
        let msg = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        Error::bad_input(path, format!("cannot decode the image: {msg}"))
    };
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes.as_slice()))
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))
    };
    // The header's size is checked against the file's before the decoder allocates for it.
    let probe = reader()?;
    let per_byte = match probe.format() {
        Some(image::ImageFormat::Jpeg) => MAX_JPEG_PIXELS_PER_BYTE,
        _ => MAX_PIXELS_PER_BYTE,
    };
    let (w, h) = probe.into_dimensions().map_err(undecodable)?;
    let most = per_byte.saturating_mul(bytes.len());
    let pixels = (w as usize).checked_mul(h as usize).filter(|&p| p <= most);
    let Some(pixels) = pixels else {
        return Err(Error::bad_input(
            path,
            format!(
                "the header declares {w}x{h} pixels, more than a file of {} bytes can hold (at most {most})",
                bytes.len()
            ),
        ));
    };
    if pixels == 0 {
        return Err(Error::bad_input(
            path,
            format!("the image is empty ({w}x{h} pixels)"),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // the decoded buffer: at most 8 bytes a pixel (RGBA, 16 bits a channel), plus the decoder's own
    limits.max_alloc = Some((pixels as u64).saturating_mul(8).saturating_add(1 << 20));
    let mut decoder = reader()?;
    decoder.limits(limits);
    let image = decoder.decode().map_err(undecodable)?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let grey = !image.color().has_color();
    let (channels, interleaved): (usize, Vec<f32>) = if grey {
        (1, image.to_luma32f().into_raw())
    } else {
        (3, image.to_rgb32f().into_raw())
    };
    // Interleaved [H, W, C] in [0, 1] -> planes [C, H, W] in [-1, 1].
    let mut planes = vec![0f32; interleaved.len()];
    for (k, &v) in interleaved.iter().enumerate() {
        let (pixel, c) = (k / channels, k % channels);
        planes[c * height * width + pixel] = 2.0 * v - 1.0;
    }
    match image_size {
        Some(size) => Ok(Decoded {
            planes: resize_and_crop(&planes, channels, height, width, size)?,
            channels,
            height: size,
            width: size,
        }),
        None => Ok(Decoded {
            planes,
            channels,
            height,
            width,
        }),
    }
}

/// Loads `split` of an image folder (see the module docs).
pub fn load_dir(
    dir: &Path,
    split: Split,
    image_size: Option<usize>,
    channels: Option<usize>,
) -> Result<ImageDataset> {
    let (root, class_roots) = split_root(dir, split)?;
    let mut files = Vec::new();
    collect_images(&root, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::bad_input(
            &root,
            format!(
                "no images found (looked recursively for {} files)",
                EXTENSIONS.map(|e| format!(".{e}")).join(", ")
            ),
        ));
    }

    // Labels: the first path component under the root, when every image has one.
    let first_parts: Vec<Option<String>> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(&root).ok()?;
            let mut parts = rel.components();
            let first = parts.next()?;
            parts.next()?; // the file itself: `first` must be a folder
            Some(first.as_os_str().to_string_lossy().into_owned())
        })
        .collect();
    let (labels, class_names) = if first_parts.iter().all(Option::is_some) {
        let mut names: Vec<String> = class_roots.iter().flat_map(|r| subfolders(r)).collect();
        names.sort();
        names.dedup();
        let labels = first_parts
            .iter()
            .flatten()
            .map(|p| names.binary_search(p).map(|i| i as u32))
            .collect::<std::result::Result<Vec<u32>, usize>>()
            .map_err(|_| Error::bad_input(&root, "a class subfolder changed while it was being read"))?;
        (Some(labels), Some(names))
    } else {
        (None, None)
    };

    let decoded: Vec<Result<Decoded>> = files.par_iter().map(|f| decode(f, image_size)).collect();
    let mut images = Vec::with_capacity(decoded.len());
    for (file, d) in files.iter().zip(decoded) {
        let d = d?;
        if let Some(first) = images.first() {
            let first: &Decoded = first;
            if (d.height, d.width) != (first.height, first.width) {
                return Err(Error::bad_input(
                    file,
                    format!(
                        "image is {}x{} (height x width), expected {}x{} like {}; set an image size \
                         (--image-size) to resize every image",
                        d.height,
                        d.width,
                        first.height,
                        first.width,
                        files[0].display()
                    ),
                ));
            }
        }
        images.push(d);
    }

    let target = match channels {
        Some(c) => c,
        None if images.iter().all(|d| d.channels == 1) => 1,
        None => 3,
    };
    let (height, width) = (images[0].height, images[0].width);
    let mut pixels = Vec::with_capacity(images.len() * target * height * width);
    for d in images {
        pixels.extend(convert_channels(d.planes, d.channels, target)?);
    }
    let mut source = format!("image folder {}", root.display());
    if let Some(names) = &class_names {
        source.push_str(&format!(" ({} classes)", names.len()));
    }
    ImageDataset::new(pixels, [target, height, width], labels, class_names, source)
}
