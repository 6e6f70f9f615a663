//! MNIST / Fashion-MNIST IDX files: `{train,t10k}-images-idx3-ubyte[.gz]` and
//! `{train,t10k}-labels-idx1-ubyte[.gz]`.
//!
//! Format (LeCun et al., <http://yann.lecun.com/exdb/mnist/>): big-endian `u32` magic number,
//! one big-endian `u32` per dimension, then the data as unsigned bytes, row-major.
//!
//! ```text
//! images: magic 2051 (0x00000803: ubyte, 3 dims), n, rows, cols, then n * rows * cols pixels
//! labels: magic 2049 (0x00000801: ubyte, 1 dim),  n,             then n labels
//! ```
//!
//! A file starting with the gzip magic bytes `1f 8b` is decompressed first, whatever its name.
//! The file length must match the header exactly (a truncated file and trailing bytes are both
//! errors), and the images and labels must have the same count.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{ImageDataset, Split};
use crate::error::{Error, Result};

/// The IDX magic number of an unsigned-byte, 3-dimensional array (images).
pub const IMAGES_MAGIC: u32 = 2051;
/// The IDX magic number of an unsigned-byte, 1-dimensional array (labels).
pub const LABELS_MAGIC: u32 = 2049;

/// Decoded IDX images: `count` images of `rows x cols` unsigned bytes, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `count * rows * cols` pixels (0 = black, 255 = white).
    pub pixels: Vec<u8>,
}

/// The file's bytes, gunzipped if they start with the gzip magic `1f 8b`.
pub fn decompress(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::bad_input(path, format!("not a valid gzip file ({e})")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Reads (and gunzips) a file.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decompress(bytes, path)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks the magic number; the message names what was found when it is the other IDX kind.
fn check_magic(bytes: &[u8], path: &Path, want: u32, what: &str) -> Result<()> {
    let magic = be_u32(bytes, 0).ok_or_else(|| {
        Error::bad_input(
            path,
            format!("truncated: {} bytes, too short for an IDX header", bytes.len()),
        )
    })?;
    if magic != want {
        let hint = match magic {
            IMAGES_MAGIC => " (this is an IDX images file)",
            LABELS_MAGIC => " (this is an IDX labels file)",
            _ => "",
        };
        return Err(Error::bad_input(
            path,
            format!("magic number {magic}, expected {want} (IDX {what}){hint}"),
        ));
    }
    Ok(())
}

/// Checks that `bytes` holds exactly `header + body` bytes.
fn check_length(bytes: &[u8], path: &Path, header: usize, body: usize, what: &str) -> Result<()> {
    let want = body
        .checked_add(header)
        .ok_or_else(|| Error::bad_input(path, format!("header sizes overflow ({what})")))?;
    if bytes.len() != want {
        let kind = if bytes.len() < want {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(Error::bad_input(
            path,
            format!(
                "{kind}: the header says {what} = {want} bytes with the header, the file has {}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Parses an IDX images file (already gunzipped). `path` names the file in errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages> {
    check_magic(bytes, path, IMAGES_MAGIC, "images")?;
    let dims: Option<Vec<u32>> = (1..4).map(|k| be_u32(bytes, 4 * k)).collect();
    let dims = dims.ok_or_else(|| {
        Error::bad_input(
            path,
            format!("truncated: {} bytes, an IDX images header needs 16", bytes.len()),
        )
    })?;
    let (count, rows, cols) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
    if rows == 0 || cols == 0 {
        return Err(Error::bad_input(
            path,
            format!("image size {rows}x{cols}, expected positive rows and columns"),
        ));
    }
    let body = count
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| Error::bad_input(path, format!("header sizes overflow: {count} x {rows} x {cols}")))?;
    check_length(bytes, path, 16, body, &format!("{count} images of {rows}x{cols}"))?;
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: bytes[16..].to_vec(),
    })
}

/// Parses an IDX labels file (already gunzipped). `path` names the file in errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    check_magic(bytes, path, LABELS_MAGIC, "labels")?;
    let count = be_u32(bytes, 4).ok_or_else(|| {
        Error::bad_input(
            path,
            format!("truncated: {} bytes, an IDX labels header needs 8", bytes.len()),
        )
    })? as usize;
    check_length(bytes, path, 8, count, &format!("{count} labels"))?;
    Ok(bytes[8..].to_vec())
}

/// Builds a dataset from parsed images and optional labels (same count, or an error naming
/// `labels_path`).
pub fn to_dataset(
    images: IdxImages,
    labels: Option<(Vec<u8>, &Path)>,
    source: String,
) -> Result<ImageDataset> {
    let labels = match labels {
        Some((labels, path)) => {
            if labels.len() != images.count {
                return Err(Error::bad_input(
                    path,
                    format!(
                        "{} labels, expected {} (one per image in the images file)",
                        labels.len(),
                        images.count
                    ),
                ));
            }
            Some(labels.into_iter().map(u32::from).collect())
        }
        None => None,
    };
    let pixels = images.pixels.iter().map(|&v| super::unit_from_u8(v)).collect();
    ImageDataset::new(pixels, [1, images.rows, images.cols], labels, None, source)
}

/// The file-name prefixes of a split: `train` for train, `t10k` (MNIST's name) or `test` for test.
fn prefixes(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Test => &["t10k", "test"],
    }
}

/// Finds `{prefix}-{kind}-idx{dims}-ubyte[.gz]` (or MNIST mirrors' `{prefix}-{kind}.idx{dims}-ubyte`)
/// in `dir`; the uncompressed file wins when both exist.
fn find(dir: &Path, split: Split, kind: &str, dims: u8) -> Option<PathBuf> {
    for prefix in prefixes(split) {
        for sep in ["-", "."] {
            for ext in ["", ".gz"] {
                let p = dir.join(format!("{prefix}-{kind}{sep}idx{dims}-ubyte{ext}"));
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// The images file and the labels file (if any) of `split` in `dir`.
pub fn split_files(dir: &Path, split: Split) -> (Option<PathBuf>, Option<PathBuf>) {
    (find(dir, split, "images", 3), find(dir, split, "labels", 1))
}

/// True when `dir` holds IDX images of either split.
pub fn is_idx_dir(dir: &Path) -> bool {
    split_files(dir, Split::Train).0.is_some() || split_files(dir, Split::Test).0.is_some()
}

/// Loads `split` from a directory of IDX files. A missing labels file gives an unlabelled
/// dataset; a missing images file is an error listing the names looked for.
pub fn load_dir(dir: &Path, split: Split) -> Result<ImageDataset> {
    let (images_path, labels_path) = split_files(dir, split);
    let images_path = images_path.ok_or_else(|| {
        let names: Vec<String> = prefixes(split)
            .iter()
            .map(|p| format!("{p}-images-idx3-ubyte[.gz]"))
            .collect();
        Error::bad_input(
            dir,
            format!(
                "no IDX images file for the {split} split (looked for {})",
                names.join(" or ")
            ),
        )
    })?;
    let images = parse_images(&read_file(&images_path)?, &images_path)?;
    let labels = match &labels_path {
        Some(p) => Some((parse_labels(&read_file(p)?, p)?, p.as_path())),
        None => None,
    };
    let source = match &labels_path {
        Some(l) => format!(
            "IDX {} + {}",
            images_path.display(),
            l.file_name().unwrap_or_default().to_string_lossy()
        ),
        None => format!("IDX {} (no labels file)", images_path.display()),
    };
    to_dataset(images, labels, source)
}
